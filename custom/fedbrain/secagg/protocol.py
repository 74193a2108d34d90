"""Pairwise-masking secure aggregation (Bonawitz et al. 2017, with its signed-key variant), one job at a time.

Once per job (setup, three exchanges through the server):

1. *advertise*: each site makes two fresh X25519 pairs (``c`` to encrypt shares, ``s`` for masks) and signs
   both public keys, its name and the job id with its provisioned kit key; its certificate travels along;
2. *share*: each site checks every advertisement (certificate issued by the consortium's root CA to the
   name it claims, valid signature, this job) and refuses the job if one fails, so a server cannot swap
   keys; it then splits its ``s`` secret key and one fresh self-mask seed per round t-of-n (Shamir) and
   encrypts each peer's shares to that peer (X25519 + HKDF + ChaCha20-Poly1305, names and job bound);
3. *deliver*: the server forwards the encrypted shares; each site keeps the ones addressed to it.

Each round a site sends ``y = x + PRG(b_round) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)`` (mod 2**32),
where ``s_uv`` is the X25519 secret it agreed with peer v. The server adds what arrives; pairwise masks
cancel between sites that both sent. It then tells the survivors who sent and who did not; each survivor
returns its share of every sender's round self-mask seed and of every non-sender's ``s`` key, never both for
one site, and never a self-mask share for a site whose key it has revealed. With t shares the server removes
the self-masks and the non-senders' pairwise masks and holds the sum of the senders' updates, nothing else.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from fedbrain.secagg import shamir
from fedbrain.secagg.masking import RING_DTYPE, prg

MASK_INFO = b"fedbrain secagg pairwise mask seed"
SHARE_INFO = b"fedbrain secagg share encryption"


class SecAggError(RuntimeError):
    """One line: why this site or the server will not go on with secure aggregation in this job."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode())


def _raw_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def threshold_for(n: int) -> int:
    """t > n/2 (a majority of the job's sites), and at least 2."""
    return max(2, n // 2 + 1)


@dataclass
class Identity:
    """A participant's provisioned identity: its kit key, its certificate, the consortium's root CA."""

    name: str
    private_key: object
    cert_pem: bytes
    root_ca_pem: bytes

    @classmethod
    def from_kit(cls, kit: str | Path, name: str) -> "Identity":
        startup = Path(kit) / "startup"
        return cls(name, serialization.load_pem_private_key((startup / "client.key").read_bytes(), password=None),
                   (startup / "client.crt").read_bytes(), (startup / "rootCA.pem").read_bytes())

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                           salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verified_public_key(cert_pem: bytes, root_ca_pem: bytes, name: str, now=None):
    """The public key of ``cert_pem`` if the consortium's root CA issued it to ``name`` and it is valid now."""
    try:
        cert, root = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(root_ca_pem)
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise SecAggError(f"the certificate sent for '{name}' was not issued by this consortium's root CA ({e})") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != name:
        raise SecAggError(f"the certificate sent for '{name}' is issued to '{names[0].value if names else ''}'")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SecAggError(f"the certificate sent for '{name}' is not valid now")
    return cert.public_key()


def _verify(public_key, signature: bytes, data: bytes) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                       salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
    else:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))


def _signed_part(ad: dict) -> bytes:
    return json.dumps({k: ad[k] for k in ("site", "job_id", "c_pk", "s_pk")}, sort_keys=True).encode()


def pairwise_sign(u: str, v: str) -> int:
    """+1 if ``u`` adds the mask it shares with ``v``, -1 if it subtracts it (names in sorted order)."""
    return 1 if u < v else -1


def pairwise_seed(own_s: X25519PrivateKey, peer_s_pk: bytes, job_id: str, u: str, v: str) -> bytes:
    """The mask seed ``u`` and ``v`` agree on (the same at both ends)."""
    pair = "|".join(sorted((u, v))).encode()
    return _hkdf(own_s.exchange(X25519PublicKey.from_public_bytes(peer_s_pk)),
                 MASK_INFO + b"|" + job_id.encode() + b"|" + pair)


class SiteSecAgg:
    """One site's part of one job."""

    def __init__(self, identity: Identity, job_id: str, rounds: list[int]):
        self.me, self.job_id, self.rounds = identity, str(job_id), [int(r) for r in rounds]
        self._c, self._s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self._self_seeds = {r: secrets.token_bytes(32) for r in self.rounds}
        self.peers: dict[str, dict] = {}  # name -> verified advertisement
        self.index: dict[str, int] = {}  # name -> Shamir x (1..n, by sorted name)
        self.threshold = 0
        self._held: dict[str, dict] = {}  # peer -> {"s": share, "b": {round: share}} it gave me
        self._pair_seeds: dict[str, bytes] = {}
        self._key_revealed: set[str] = set()  # peers whose s share I have given out
        self._answered: dict[int, tuple] = {}  # round -> (senders, non-senders) I answered for
        self.members: list[str] = []  # the sites whose shares I hold: the job's masking group

    # ---- setup --------------------------------------------------------------------------------
    def advertise(self) -> dict:
        ad = {"site": self.me.name, "job_id": self.job_id, "c_pk": _b64(_raw_public(self._c)),
              "s_pk": _b64(_raw_public(self._s))}
        return {**ad, "cert": self.me.cert_pem.decode(), "signature": _b64(self.me.sign(_signed_part(ad)))}

    def share(self, advertisements: list[dict], threshold: int) -> dict[str, str]:
        """Check every advertisement, then this site's shares, each encrypted to its peer: {peer: blob}."""
        peers = {}
        for ad in advertisements:
            name = str(ad.get("site"))
            if name in peers:
                raise SecAggError(f"two advertisements for '{name}'")
            if ad.get("job_id") != self.job_id:
                raise SecAggError(f"the advertisement of '{name}' is for job {ad.get('job_id')}, not {self.job_id}")
            key = verified_public_key(str(ad.get("cert", "")).encode(), self.me.root_ca_pem, name)
            try:
                _verify(key, _unb64(ad["signature"]), _signed_part(ad))
            except (InvalidSignature, KeyError, ValueError):
                raise SecAggError(f"the keys advertised for '{name}' do not carry its signature: the server (or "
                                  f"someone on the way) changed them") from None
            peers[name] = ad
        mine = {"c_pk": _b64(_raw_public(self._c)), "s_pk": _b64(_raw_public(self._s))}
        if {k: peers.get(self.me.name, {}).get(k) for k in mine} != mine:
            raise SecAggError(f"the server's list does not hold this site's own keys as advertised")
        if len(peers) < threshold or threshold < threshold_for(len(peers)):
            raise SecAggError(f"{len(peers)} sites advertised keys with threshold {threshold}; at least "
                              f"{threshold_for(len(peers))} of them must be needed to unmask")
        self.peers, self.threshold = peers, int(threshold)
        names = sorted(peers)
        self.index = {name: i + 1 for i, name in enumerate(names)}
        s_shares = shamir.split(self._s.private_bytes_raw(), len(names), self.threshold)
        b_shares = {r: shamir.split(seed, len(names), self.threshold) for r, seed in self._self_seeds.items()}
        out = {}
        for name in names:
            i = self.index[name] - 1
            plain = json.dumps({"s": s_shares[i][1], "b": {str(r): b_shares[r][i][1] for r in self.rounds}}).encode()
            out[name] = _b64(self._seal(name, plain))
        return out

    def _share_key(self, peer: str) -> bytes:
        secret = self._c.exchange(X25519PublicKey.from_public_bytes(_unb64(self.peers[peer]["c_pk"])))
        return _hkdf(secret, SHARE_INFO + b"|" + self.job_id.encode())

    def _seal(self, peer: str, plain: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        aad = f"{self.job_id}|{self.me.name}->{peer}".encode()
        return nonce + ChaCha20Poly1305(self._share_key(peer)).encrypt(nonce, plain, aad)

    def receive(self, blobs: dict[str, str], members: list[str]) -> None:
        """Keep the shares the ``members`` (the sites that shared) sent to this site."""
        missing = [m for m in members if m not in blobs]
        if missing or self.me.name not in members or not set(members) <= set(self.peers):
            raise SecAggError(f"the shares delivered do not match the sites that shared (missing: {missing})")
        if len(members) < self.threshold:
            raise SecAggError(f"only {len(members)} sites shared, fewer than the threshold {self.threshold}")
        for sender in members:
            blob = _unb64(blobs[sender])
            aad = f"{self.job_id}|{sender}->{self.me.name}".encode()
            try:
                plain = ChaCha20Poly1305(self._share_key(sender)).decrypt(blob[:12], blob[12:], aad)
            except InvalidTag:
                raise SecAggError(f"the shares from '{sender}' do not decrypt: altered on the way") from None
            held = json.loads(plain)
            self._held[sender] = {"s": int(held["s"]), "b": {int(r): int(v) for r, v in held["b"].items()}}
        self.members = sorted(members)
        self._pair_seeds = {v: pairwise_seed(self._s, _unb64(self.peers[v]["s_pk"]), self.job_id, self.me.name, v)
                            for v in self.members if v != self.me.name}

    # ---- each round -----------------------------------------------------------------------------
    def mask(self, quantized: np.ndarray, round_no: int) -> np.ndarray:
        """This round's masked vector of ``quantized`` (ring elements)."""
        if not self.members:
            raise SecAggError("no masking group: the job's secure-aggregation setup did not complete at this site")
        if round_no not in self._self_seeds:
            raise SecAggError(f"round {round_no} is not one of this job's rounds {self.rounds[0]}..{self.rounds[-1]}")
        n = quantized.size
        y = np.asarray(quantized, dtype=RING_DTYPE).ravel() + prg(self._self_seeds[round_no], round_no, n)
        for v, seed in self._pair_seeds.items():
            if pairwise_sign(self.me.name, v) > 0:
                y += prg(seed, round_no, n)
            else:
                y -= prg(seed, round_no, n)
        return y

    def unmask_shares(self, round_no: int, senders: list[str], non_senders: list[str]) -> dict:
        """Shares for the server: the senders' round self-mask seeds, the non-senders' mask keys."""
        senders, non_senders = sorted(set(senders)), sorted(set(non_senders))
        if set(senders) & set(non_senders):
            raise SecAggError(f"round {round_no}: the server names {sorted(set(senders) & set(non_senders))} both as "
                              f"having sent and not: nothing revealed")
        if set(senders) | set(non_senders) != set(self.members):
            raise SecAggError(f"round {round_no}: the server's lists do not cover the job's masking group")
        if self.me.name not in senders:
            raise SecAggError(f"round {round_no}: the server says this site sent nothing")
        if len(senders) < self.threshold:
            raise SecAggError(f"round {round_no}: {len(senders)} sites sent, fewer than the threshold "
                              f"{self.threshold}: nothing revealed")
        answered = self._answered.get(round_no)
        if answered is not None and answered != (tuple(senders), tuple(non_senders)):
            raise SecAggError(f"round {round_no}: asked again with other lists: nothing more revealed")
        revealed = sorted(set(senders) & self._key_revealed)
        if revealed:
            raise SecAggError(f"round {round_no}: {revealed} had their mask keys revealed in an earlier round: "
                              f"their self-masks stay hidden")
        self._answered[round_no] = (tuple(senders), tuple(non_senders))
        self._key_revealed |= set(non_senders)
        return {"x": self.index[self.me.name],
                "b": {v: format(self._held[v]["b"][round_no], "x") for v in senders},
                "s": {v: format(self._held[v]["s"], "x") for v in non_senders}}


class ServerSecAgg:
    """The server's part: route the setup messages, add masked vectors, remove the masks of a round."""

    def __init__(self, job_id: str):
        self.job_id = str(job_id)
        self.advertisements: dict[str, dict] = {}
        self.members: list[str] = []
        self.threshold = 0
        self._revealed_keys: dict[str, bytes] = {}

    def setup(self, advertisements: list[dict]) -> int:
        """Keep the advertisements (checked by the sites, not trusted here); the threshold for them."""
        self.advertisements = {str(ad["site"]): ad for ad in advertisements}
        self.threshold = threshold_for(len(self.advertisements))
        return self.threshold

    def route(self, shares_by_sender: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        """{recipient: {sender: blob}} from each sender's {recipient: blob}; the members are the senders."""
        self.members = sorted(shares_by_sender)
        if len(self.members) < self.threshold:
            raise SecAggError(f"only {len(self.members)} sites shared, fewer than the threshold {self.threshold}")
        return {r: {s: shares_by_sender[s][r] for s in self.members} for r in self.members}

    def unmask(self, masked_sum: np.ndarray, round_no: int, senders: list[str], answers: dict[str, dict]) -> np.ndarray:
        """The sum of the senders' updates (ring elements) from the masked sum and the survivors' shares."""
        non_senders = [m for m in self.members if m not in senders]
        if len(answers) < self.threshold:
            raise SecAggError(f"round {round_no}: {len(answers)} sites returned unmasking shares, fewer than the "
                              f"threshold {self.threshold}: the sum stays masked")
        def rebuild(kind: str, site: str) -> bytes:
            try:
                return shamir.combine([(int(a["x"]), int(a[kind][site], 16)) for a in answers.values()], self.threshold)
            except (KeyError, TypeError, ValueError) as e:
                raise SecAggError(f"round {round_no}: the unmasking shares for '{site}' are incomplete or "
                                  f"inconsistent ({type(e).__name__}: {e}): the sum stays masked") from None

        total = np.asarray(masked_sum, dtype=RING_DTYPE).copy()
        n = total.size
        for w in senders:
            total -= prg(rebuild("b", w), round_no, n)
        for v in non_senders:
            if v not in self._revealed_keys:
                self._revealed_keys[v] = rebuild("s", v)
            s_v = X25519PrivateKey.from_private_bytes(self._revealed_keys[v])
            for u in senders:
                seed = pairwise_seed(s_v, _unb64(self.advertisements[u]["s_pk"]), self.job_id, v, u)
                if pairwise_sign(u, v) > 0:  # u added this mask: take it out
                    total -= prg(seed, round_no, n)
                else:
                    total += prg(seed, round_no, n)
        return total

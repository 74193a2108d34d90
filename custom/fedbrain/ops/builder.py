"""FLARE provisioning builders that make a kit a fedbrain kit.

``SitePolicyBuilder`` (listed in project.yml before FLARE's SignatureBuilder, so FLARE's own
signature covers what it writes) puts a hospital's decisions into each kit's ``local/``:

- ``privacy.json``: the named privacy scopes a job may ask for (``standard``, ``dp``,
  ``encrypted``) and the site's ``default_scope``; FLARE applies a scope's filters to every
  job at that site, before the job's own filters;
- ``authorization.json``: FLARE's roles with ``byoc`` granted to nobody: fedbrain jobs carry
  no code (sites run the fedbrain they installed), so a job that does is refused;
- ``resources.json``: the class allow-list (FLARE's defaults plus the exact classes fedbrain's apps
  name: :mod:`fedbrain.ops.allowlist`; no module prefix, no function),
  fedbrain's job launcher at sites (a job process killed by a signal does not fail the job), log streaming off unless the project file turns it on, and for the server job storage
  under ``storage_root`` instead of FLARE's ``/tmp/nvflare``, a log of refused TLS handshakes and the continuation
  of jobs a server restart interrupted (:mod:`fedbrain.fl.autoresume`);
- ``fedbrain_site.json.template``: where the hospital says where its data is;

and adds a start-time check of the kit (:mod:`fedbrain.ops.kit_guard`) to ``sub_start.sh``.

``KitManifestBuilder`` (listed last) signs a manifest of every file in ``startup/`` and
``local/`` with the consortium's root key, or the participant's own key where its owner assembles the
kit (distributed provisioning, :mod:`fedbrain.ops.distributed`; :mod:`fedbrain.ops.kit`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nvflare.lighter.constants import CtxKey, ParticipantType
from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedbrain.ops.kit import write_manifest


#: Scope names, in the order a hospital would read them (see docs/privacy.md), and what each
#: adds to `standard` (personal-head exclusion + update-norm clip).
SCOPE_PARTS = {
    "standard": (),
    "dp": ("client_dp",),
    "encrypted": ("require_encryption",),
    "dp_encrypted": ("client_dp", "require_encryption"),
    "secagg": ("require_secagg",),
    "dp_secagg": ("client_dp", "require_secagg"),
}
SCOPES = tuple(SCOPE_PARTS)
#: What a federated update must never contain: the classifier's personal head (regex on
#: state_dict keys; an Opacus-wrapped model names it ``_module.head.``).
PERSONAL_PARTS = r"(^|\.)head\."
#: The same for a hospital that sends no grade head at all (``send_shared_head: false`` in project.yml): its final
#: check also refuses the shared head of ``--algorithm mixed``, with the reason, rather than send it.
EVERY_GRADE_HEAD = r"(^|\.)(shared_)?head\."

FINAL_CHECK = "fedbrain.filters.final_check.FinalPayloadCheck"
FINAL_CHECK_ID = "fedbrain_final_payload_check"

GUARD_LINE = ('python3 -m fedbrain.ops.kit_guard "$SOURCE_WORKSPACE" '
              '|| { echo "fedbrain: this kit was refused; see the lines above (also in log.txt)"; exit 1; }')
GUARD_ANCHOR = 'echo "WORKSPACE set to $WORKSPACE"'


def offered_scopes(default_scope: str, he: bool = True) -> list[str]:
    """The scopes a site offers: its default and those that protect at least as much. A job may
    name any scope a site defines, so a site whose default is `encrypted` must not define
    `standard`, or a job could choose plaintext there. ``he=False`` (a kit without the HE key: one
    its owner assembled) leaves out the scopes that need it."""
    if default_scope not in SCOPE_PARTS:
        raise ValueError(f"default_scope '{default_scope}' is not one of {', '.join(SCOPES)}")
    floor = set(SCOPE_PARTS[default_scope])
    if not he and "require_encryption" in floor:
        raise ValueError(f"default_scope '{default_scope}' needs the HE key, which this kit does not hold")
    return [name for name, parts in SCOPE_PARTS.items()
            if floor <= set(parts) and (he or "require_encryption" not in parts)]


def privacy_policy(default_scope: str = "standard", update_norm_clip: float = 100.0,
                   client_dp_clip: float = 1.0, client_dp_noise: float = 1.0, he: bool = True,
                   send_shared_head: bool = True) -> dict:
    """The privacy.json a site gets: every scope is `standard` plus its parts. ``send_shared_head=False``: the
    final check refuses any grade head, the federated ``shared_head`` of algorithm mixed too."""
    from fedbrain.contracts import PRIVACY_FILTERS

    parts = {
        "client_dp": {"path": PRIVACY_FILTERS["client_dp"],
                      "args": {"clip_norm": float(client_dp_clip), "noise_multiplier": float(client_dp_noise)}},
        "require_encryption": {"path": PRIVACY_FILTERS["require_encryption"], "args": {}},
    }
    standard = [
        {"path": "nvflare.app_common.filters.exclude_vars.ExcludeVars", "args": {"exclude_vars": PERSONAL_PARTS}},
        {"path": PRIVACY_FILTERS["clip"], "args": {"max_norm": float(update_norm_clip)}},
    ]
    offered = offered_scopes(default_scope, he)
    return {
        "scopes": [{"name": name, "properties": {},
                    "task_result_filters": standard + [parts[p] for p in SCOPE_PARTS[name] if p in parts]}
                   for name in offered],
        "default_scope": default_scope,
        # Runs in every job process after the job's own components: the scope's promise checked on
        # the final payload, after the job's filters (fedbrain.filters.final_check).
        "components": [{"id": FINAL_CHECK_ID, "path": FINAL_CHECK,
                        "args": {"scope_parts": {name: list(SCOPE_PARTS[name]) for name in offered},
                                 "personal_parts": PERSONAL_PARTS if send_shared_head else EVERY_GRADE_HEAD}}],
    }


def authorization_policy() -> dict:
    """FLARE's default roles, with custom code (``byoc``) allowed to nobody, the project admin included.

    FLARE's own default gives the project admin ``"any"``, which cannot exclude one right, so
    every right FLARE's admin commands check is granted by name instead.
    """
    from nvflare.apis.fl_constant import AdminCommandNames
    from nvflare.security.security import CommandCategory

    rights = {v for k, v in vars(AdminCommandNames).items() if not k.startswith("_") and isinstance(v, str)}
    rights |= {v for k, v in vars(CommandCategory).items() if not k.startswith("_") and isinstance(v, str)}
    return {
        "format_version": "1.0",
        "permissions": {
            "project_admin": {**{r: "any" for r in sorted(rights)}, "byoc": "none"},
            "org_admin": {"submit_job": "none", "clone_job": "none", "manage_job": "o:submitter",
                          "download_job": "o:submitter", "view": "any", "operate": "o:site",
                          "shell_commands": "o:site", "byoc": "none", "show_stats": "none"},
            "lead": {"submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter",
                     "download_job": "n:submitter", "view": "any", "operate": "o:site",
                     "shell_commands": "o:site", "byoc": "none", "show_stats": "none"},
            "member": {"view": "any", "show_stats": "none"},
        },
    }


def resources_with_policy(default_resources: dict, kind: str, allow_log_streaming: bool,
                          storage_root: str | None = None) -> dict:
    """FLARE's generated resources with fedbrain's exact allow-list (``kind``: server or client), log
    streaming and storage decided. FLARE's generated list is replaced, not extended: any prefix in it
    would admit more than classes."""
    from fedbrain.ops.allowlist import class_allow_list

    res = json.loads(json.dumps(default_resources))
    res["class_allow_list"] = class_allow_list(kind)
    res["class_list_enforcement_mode"] = "enforce"
    if "allow_log_streaming" in res or allow_log_streaming is not None:
        res["allow_log_streaming"] = bool(allow_log_streaming)
    if storage_root:
        _move_server_storage(res, storage_root)
    return res


def _move_server_storage(res: dict, storage_root: str) -> None:
    """Point the server's job store and snapshots under ``storage_root`` (FLARE defaults to /tmp/nvflare)."""
    root = str(storage_root).rstrip("/")
    snap = res.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args")
    if snap is not None:
        snap["root_dir"] = f"{root}/snapshot-storage"
    for comp in res.get("components", []):
        if comp.get("id") == "job_manager":
            comp.setdefault("args", {})["uri_root"] = f"{root}/jobs-storage"


def use_site_job_launcher(res: dict) -> None:
    """A site's job process killed by a signal leaves the federation instead of failing the job
    for every hospital (:mod:`fedbrain.fl.launcher`)."""
    for comp in res.get("components", []):
        if comp.get("path") == "nvflare.app_common.job_launcher.client_process_launcher.ClientProcessJobLauncher":
            comp["path"] = "fedbrain.fl.launcher.SiteJobLauncher"


#: The server component that logs each refused TLS handshake (fedbrain.ops.handshake_log).
HANDSHAKE_LOG = {"id": "fedbrain_refused_handshakes", "path": "fedbrain.ops.handshake_log.RefusedHandshakeLog",
                 "args": {}}


def _add_component(res: dict, component: dict) -> None:
    comps = res.setdefault("components", [])
    if not any(c.get("id") == component["id"] for c in comps):
        comps.append(dict(component))


def log_refused_handshakes(res: dict) -> None:
    """The server logs who tried to connect with a certificate it refuses (FLARE's server stays silent)."""
    _add_component(res, HANDSHAKE_LOG)


#: The server component that continues a job a server restart interrupted (fedbrain.fl.autoresume).
AUTO_RESUME = {"id": "fedbrain_resume_interrupted_jobs", "path": "fedbrain.fl.autoresume.ResumeInterruptedJobs",
               "args": {}}


def resume_interrupted_jobs(res: dict) -> None:
    """A restarted server continues each interrupted job from its last saved round, with no command typed."""
    _add_component(res, AUTO_RESUME)


def use_warm_job_start(res: dict) -> None:
    """POC kits only: job processes forked from a process that has imported torch, MONAI and FLARE
    already (:mod:`fedbrain.poc.warm`); a production kit's job process always starts clean."""
    warm = {"nvflare.app_common.job_launcher.server_process_launcher.ServerProcessJobLauncher":
            "fedbrain.poc.warm.WarmServerJobLauncher",
            "fedbrain.fl.launcher.SiteJobLauncher": "fedbrain.poc.warm.WarmSiteJobLauncher"}
    for comp in res.get("components", []):
        comp["path"] = warm.get(comp.get("path"), comp.get("path"))


def site_config_template() -> dict:
    """local/fedbrain_site.json.template: copy to fedbrain_site.json and fill in (docs/hospital-it.md)."""
    return {
        "datalist": "/data/brats/datalist.json",
        "data_root": "/data/brats",
        "num_threads": 4,
        "device": "auto",
        "dp_budget": {"epsilon": 10.0, "delta": 1e-6},
        "require_dp": True,  # with a budget, a job without DP is refused (set false only on purpose)
        "min_trained_sites": 2,  # never train on a global model fewer sites trained
        "min_validation_cases": 5,  # below this, no per-site validation metric leaves the site
        "share_metrics": "all",  # or "minimal": only what the federation needs to run
    }


def add_kit_guard(sub_start: Path) -> None:
    """Check the kit (manifest, certificates, server TLS) before FLARE starts from it."""
    text = sub_start.read_text()
    if GUARD_LINE in text:
        return
    if GUARD_ANCHOR not in text:
        raise RuntimeError(f"{sub_start}: FLARE's start script changed; cannot place fedbrain's kit check")
    sub_start.write_text(text.replace(GUARD_ANCHOR, GUARD_LINE + "\n" + GUARD_ANCHOR, 1))


def _flag(value, default: bool) -> bool:
    """A yes/no project-file property read as written (FLARE 2.9 reads False as unset)."""
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class SitePolicyBuilder(Builder):
    def __init__(self, default_scope: str = "standard", update_norm_clip: float = 100.0,
                 client_dp_clip: float = 1.0, client_dp_noise: float = 1.0,
                 allow_log_streaming: bool = False, storage_root: str | None = None, warm_job_start: bool = False):
        """Args are consortium-wide defaults; a participant in project.yml may set its own
        ``default_scope``, ``allow_log_streaming``, ``send_shared_head`` (sites) or ``storage_root`` (server).
        ``warm_job_start``: POC projects only (:func:`use_warm_job_start`)."""
        privacy_policy(default_scope, update_norm_clip, client_dp_clip, client_dp_noise)  # refuse bad args early
        self.default_scope = default_scope
        self.update_norm_clip = update_norm_clip
        self.client_dp_clip = client_dp_clip
        self.client_dp_noise = client_dp_noise
        self.allow_log_streaming = allow_log_streaming
        self.storage_root = storage_root
        self.warm_job_start = _flag(warm_job_start, False)

    def build(self, project: Project, ctx: ProvisionContext):
        for p in project.get_all_participants():
            local = Path(ctx.get_local_dir(p))
            startup = Path(ctx.get_kit_dir(p))
            if p.type == ParticipantType.ADMIN:
                continue
            default_path = local / "resources.json.default"
            default = json.loads(default_path.read_text()) if default_path.exists() else {}
            streaming = _flag(p.props.get("allow_log_streaming"), self.allow_log_streaming)
            (local / "authorization.json").write_text(json.dumps(authorization_policy(), indent=2) + "\n")
            if p.type == ParticipantType.SERVER:
                storage = p.props.get("storage_root", self.storage_root) or "/var/lib/fedbrain/server"
                res = resources_with_policy(default, "server", None, storage_root=storage)
                log_refused_handshakes(res)
                resume_interrupted_jobs(res)
            else:
                res = resources_with_policy(default, "client", streaming)
                use_site_job_launcher(res)
                scope = p.props.get("default_scope", self.default_scope)
                he = (startup / "client_context.tenseal").exists()  # none in a kit its owner assembled
                policy = privacy_policy(scope, self.update_norm_clip, self.client_dp_clip, self.client_dp_noise, he,
                                        send_shared_head=_flag(p.props.get("send_shared_head"), True))
                (local / "privacy.json").write_text(json.dumps(policy, indent=2) + "\n")
                (local / "privacy.json.sample").unlink(missing_ok=True)  # FLARE's names a class that does not exist
                (local / "fedbrain_site.json.template").write_text(json.dumps(site_config_template(), indent=2) + "\n")
            if self.warm_job_start:
                use_warm_job_start(res)
            # Both files: FLARE reads the first of them, and `nvflare poc prepare` rebuilds the
            # server's resources.json from the .default one (only moving its storage).
            for name in ("resources.json", "resources.json.default"):
                (local / name).write_text(json.dumps(res, indent=2) + "\n")
            sub_start = startup / "sub_start.sh"
            if sub_start.exists():
                add_kit_guard(sub_start)


class KitManifestBuilder(Builder):
    """Sign every kit's startup/ and local/; list it after every other builder.

    One-step provisioning signs with the root key. ``nvflare package`` (distributed provisioning: the kit's
    owner assembles it from a signed certificate) has no root key, so the kit is signed with its own key, and
    the kit check verifies that key's certificate against the root instead."""

    def build(self, project: Project, ctx: ProvisionContext):
        from fedbrain.ops.kit import own_private_key

        root_key = ctx.get(CtxKey.ROOT_PRI_KEY)
        signed = 0
        for p in project.get_all_participants():
            kit = Path(ctx.get_ws_dir(p))
            if root_key:
                write_manifest(kit, p.name, root_key)
            elif any((kit / "startup" / key).is_file() for key in ("client.key", "server.key")):
                write_manifest(kit, p.name, own_private_key(kit), signer="participant")
            else:  # `nvflare package` lists a placeholder server beside the one kit it assembles
                continue
            signed += 1
        if not signed:
            raise RuntimeError("no kit to sign: neither a root key in the provisioning context (list CertBuilder "
                               "before fedbrain.ops.builder.KitManifestBuilder) nor a kit holding its own key")

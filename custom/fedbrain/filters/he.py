"""Site-side decryption that leaves a site's personal part alone.

FLARE's HEModelDecryptor expects every parameter of the global model to be listed in the
aggregate's encrypted-layer map. With personal heads excluded from every update, the
aggregate (and so the map) holds only the shared parameters, while the global model still
carries its initial plaintext head: the stock decryptor then fails on the first head name.
Parameters missing from the map are plaintext by construction, so they are marked so.
"""

from __future__ import annotations

from nvflare.apis.dxo import MetaKey
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor


class SharedPartDecryptor(HEModelDecryptor):
    def process_dxo(self, dxo, shareable, fl_ctx):
        encrypted = dxo.get_meta_prop(MetaKey.PROCESSED_KEYS, None)
        if encrypted and isinstance(dxo.data, dict):
            dxo.set_meta_prop(MetaKey.PROCESSED_KEYS, {**dict.fromkeys(dxo.data, False), **encrypted})
        return super().process_dxo(dxo, shareable, fl_ctx)

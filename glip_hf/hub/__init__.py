"""Publishing: export to plain CLIP, model cards, the folder a run is published as, and pushing it to the Hub.

    python -m glip_hf.hub prepare RUN_DIR --out DIR [--flavour glip|clip] [--eval FILE.json ...]
    python -m glip_hf.hub push RUN_DIR --repo_id NAME [--flavour glip|clip] [--eval FILE.json ...] [--private]

[`prepare_folder`] and [`push_run`] do the same from Python; [`check_hub_token`] fails early when nothing could push.
"""

from .card import RunRecord, read_run, render_model_card
from .export import export_to_clip, to_clip_config
from .publish import check_hub_token, prepare_folder, push_run
from .remote_code import AUTO_MAP, write_remote_code

__all__ = [
    "AUTO_MAP",
    "RunRecord",
    "check_hub_token",
    "export_to_clip",
    "prepare_folder",
    "push_run",
    "read_run",
    "render_model_card",
    "to_clip_config",
    "write_remote_code",
]

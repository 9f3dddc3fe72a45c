"""Silences third-party messages that every run would print and that tell our users nothing they can act on.

Each filter is narrow (one message, one origin) so that anything else those libraries say still gets through:
- Lightning's advertisement for its cloud logger ("💡 Tip: ... litlogger"), logged at INFO on every fit;
- Lightning's `_pytree` use of `LeafSpec`, deprecated by torch (a warning from Lightning's own code on every fit);
- ModelCheckpoint's "Checkpoint directory ... exists and is not empty" where the directory holds only the run's
  config files (the CLI writes `config.yaml` beside the checkpoints before the callback sets up, so a fresh run
  warned; a directory with checkpoints in it still warns, see `callbacks.RunCheckpoint`).
"""

from __future__ import annotations

import logging
import warnings


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_FILTER = _DropLightningTip()


def silence_third_party_noise() -> None:
    """Install the filters (idempotent): called by the CLI in every process, before Lightning starts."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")

"""Contrastive losses: one module each, pure functions of embeddings."""

from contrastive_cli.losses.byol import byol_loss
from contrastive_cli.losses.moco import moco_infonce
from contrastive_cli.losses.ntxent import nt_xent
from contrastive_cli.losses.triplet import MINING, triplet_loss

__all__ = ["MINING", "byol_loss", "moco_infonce", "nt_xent", "triplet_loss"]

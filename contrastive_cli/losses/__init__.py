"""Contrastive losses: one module each, pure functions of embeddings."""

from contrastive_cli.losses.barlow import barlow_twins_loss
from contrastive_cli.losses.byol import byol_loss
from contrastive_cli.losses.contrastive import DISTANCES, contrastive_loss
from contrastive_cli.losses.dino import dino_center, dino_loss, teacher_temperature
from contrastive_cli.losses.moco import moco_infonce
from contrastive_cli.losses.mocov3 import mocov3_loss
from contrastive_cli.losses.nnclr import nearest_neighbours, nnclr_loss
from contrastive_cli.losses.ntxent import nt_xent
from contrastive_cli.losses.simsiam import simsiam_loss
from contrastive_cli.losses.supcon import supcon_loss
from contrastive_cli.losses.swav import sinkhorn, swav_loss
from contrastive_cli.losses.triplet import MINING, triplet_loss
from contrastive_cli.losses.vicreg import vicreg_loss, vicreg_terms

__all__ = [
    "DISTANCES",
    "MINING",
    "barlow_twins_loss",
    "byol_loss",
    "contrastive_loss",
    "dino_center",
    "dino_loss",
    "moco_infonce",
    "mocov3_loss",
    "nearest_neighbours",
    "nnclr_loss",
    "nt_xent",
    "simsiam_loss",
    "sinkhorn",
    "supcon_loss",
    "swav_loss",
    "teacher_temperature",
    "triplet_loss",
    "vicreg_loss",
    "vicreg_terms",
]

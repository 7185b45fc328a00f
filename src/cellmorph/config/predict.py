"""The settings of ``cellmorph predict`` (:class:`PredictConfig`), without numpy, pandas or torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PredictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.1, gt=0.0, lt=1.0, description="conformal error level: sets cover the true MoA of "
                         "a treatment like the calibration ones with probability ≥ 1 − alpha")
    batch_size: int = Field(16, ge=1, description="tiles per forward pass (16: as fast as 32 or 64 on a CPU, "
                            "with 0.4-0.6 GB less peak memory for Lite0 at 224 px, benchmarks/RESULTS.md)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: see cellmorph.runtime)")
    mc_dropout: int = Field(0, ge=0, description="also score every tile N times with the model's dropout active "
                            "(MC dropout): mc_prob_<class> (the mean over the passes) and MC_Entropy (predictive "
                            "entropy in nats) per tile, well and treatment; 0 = off. Needs a model trained with "
                            "drop_rate > 0")
    seed: int = Field(0, ge=0, description="seed of the MC-dropout draws")
    sets: Literal["marginal", "mondrian"] = Field(
        "marginal", description="marginal: one threshold for every MoA (coverage over treatments); mondrian: one per "
        "MoA (coverage per MoA, from that MoA's calibration treatments: needs many per MoA; with the development "
        "set's 3-9 they held 8-12 MoAs a set, benchmarks/RESULTS.md)")
    novelty_alpha: float = Field(0.1, gt=0.0, lt=1.0, description="false-alarm rate of the Novel flag: a new "
                                 "compound of a known MoA is flagged at most this often (conformal, from the "
                                 "bundle's held-out compounds of known MoAs)")
    novelty_pool: Literal["compound", "treatment"] = Field(
        "compound", description="compound: a treatment's Novelty_Score is its compound's, from the compound's "
        "treatments together (calibrated the same way; a compound acts by one MoA at every concentration): on the "
        "development set, leave one MoA out, AUROC 0.80 and 31 of 56 unseen-MoA treatments flagged at α 0.1, against "
        "0.75 and 20 alone (benchmarks/RESULTS.md); treatment: each treatment alone")
    normalize: Literal["plate", "batch"] | None = Field(
        None, description="images only: z-score against the DMSO of each plate (the model's recipe) or, for "
        "plates without DMSO, of the plate's batch; default: the model's own setting")
    skip_bad: bool = Field(False, description="images only: log and leave out unreadable images instead of stopping")
    h5ad: bool = Field(False, description="also write wells.h5ad and treatments.h5ad (AnnData: obs the Metadata_* "
                       "columns and the calls, X the probabilities, uns the provenance) for scanpy")
    reuse_freed_memory: bool = Field(False, description="make this process keep freed memory for reuse "
                                     "(glibc; about 2x faster scoring on CPU and a faster prepare, but the "
                                     "process keeps its peak memory until it exits): the CLI sets it, a library "
                                     "caller opts in")

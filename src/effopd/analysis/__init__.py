"""Parameter-dynamics analyses of a run's checkpoints (DESIGN.md "Parameter-dynamics analyses").

    io.py        read checkpoints one tensor at a time; find a run's step-N checkpoints
    spectral.py  exact / randomized SVD and the spectral metrics (effective rank, overlap, ...)
    dynamics.py  analyses 1, 4, 6, 8, 9, streamed over tensors (no evaluation needed)
    weights.py   build scaled / partially applied / low-rank models for evaluation
    evals.py     analyses 2, 3, 5, 7 (evaluate built models with a caller's eval_fn)
    run.py       analyze(): runs them all, writes analysis.json + tensors.safetensors (schema there)
"""

from effopd.analysis.io import AnalysisError, CheckpointReader, list_checkpoints, parse_checkpoint_args
from effopd.analysis.run import analyze

__all__ = ["AnalysisError", "CheckpointReader", "analyze", "list_checkpoints", "parse_checkpoint_args"]

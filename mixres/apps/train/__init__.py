from .loop import CHECKPOINT_KEYS, evaluate, main, parse_args, read_checkpoint, warmup_cosine, weights_digest

__all__ = ["main", "parse_args", "warmup_cosine", "evaluate", "weights_digest", "read_checkpoint", "CHECKPOINT_KEYS"]

"""FID of the generator being trained against an evaluation set's validation part, at intervals (rank 0 only).

Uses the FID issue's code (`pipeline.eval`): the configured feature extractor, the cached reference
statistics of the evaluation set, and the same latent seeding as the benchmark. The global RNG is left as
it was, so evaluating does not change the training trajectory (bit-exact resume still holds).
"""

from __future__ import annotations

import torch

from pipeline.config import Config


class FidEvaluator:
    """Callable: ``evaluator(G) -> FID`` over ``eval.n_samples`` images from fixed latents."""

    def __init__(self, cfg: Config, evalset_uri: str, device: torch.device, extractor=None):
        from pipeline.eval.features import build_extractor
        from pipeline.eval.refstats import reference_stats

        self.cfg, self.device = cfg, device
        # a packed group's sets share one extractor (``extractor``), each with its own evaluation set
        self.extractor = extractor if extractor is not None else build_extractor(cfg.eval, device=device)
        # the validation part: the benchmark reports the test part, which no training choice sees
        self.ref = reference_stats(cfg, evalset_uri, self.extractor, part="validation")

    def __call__(self, G: torch.nn.Module) -> float:
        from pipeline.eval.fid import extract_features, feature_statistics, frechet_distance
        from pipeline.models.sampling import generate_batches

        e = self.cfg.eval
        was_training = G.training
        G.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            batches = generate_batches(G, e.n_samples, e.seed, 1.0, e.batch_size, self.device, G.style_dim)
            feats = extract_features(batches, self.extractor, e.batch_size)
        G.train(was_training)
        mu, sigma = feature_statistics(feats)
        return float(frechet_distance(mu, sigma, self.ref.mu, self.ref.sigma))

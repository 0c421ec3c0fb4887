"""The pipeline's stages, in the order data flows through them: rollouts (``rollout``), step labels
(``shepherd``), training (``train``), model passes (``logprobs``: reference log-probs and scoring)
and evaluation (``evaluate``). Each owns its config, its Ray actors and its outputs; ``runtime``
and ``shards`` are the Ray plumbing they share."""

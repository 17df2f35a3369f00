"""Scoring: similarities of per-image embeddings fused over a probe's photos (`similarity`), from scores to one
ranking of the gallery (`ranking`), gallery-aware re-scoring (`transductive`, with nearest neighbours in
`neighbours` and identity clusters in `clusters`), the score store and its ids contract, per-probe results and what
is kept (`store`), the protocols every variant is scored on (`protocols`), the kinds of variant in a registry
(`variant_kinds`), groups of variants with their cached score matrices (`variants`), and the synthetic test split's
family signal (`signal`).

May import: kinret's base modules, `data`, `models`, `features`.
"""

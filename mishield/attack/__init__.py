"""`mishield audit`: a Plug-and-Play-style model-inversion attack (Struppek et al., ICML 2022).

The pieces are named after the paper's concepts: the Poincaré loss (`poincare`), the image
priors the attacker optimises through (`priors`), the attack engine with its initial
selection, optimisation and final selection (`ppa`), the metrics an independent evaluation
model computes (`metrics`, `evalmodel`), the typed results (`results`: `AuditReport`) and the
report files (`report`). `audit.audit` (exported as `mishield.audit`) ties them together; the
CLI is a thin layer over it.
"""

"""The attack engine: model inversion through an image prior (PPA, Struppek et al., ICML 2022, and
the adaptive LOMMA, Nguyen et al., CVPR 2023).

    config.py     AttackConfig and its named presets (the budget: S, C, I, K, A, lr, ...)
    engine.py     InversionAttack: initial selection -> optimisation -> final selection
    losses.py     the identity losses (Poincaré, logit + feature prototype, margin)
    poincare.py   the Poincaré loss
    priors.py     the image priors the attacker optimises through
    inputs.py     prior images -> a classifier's input (resize, channels, normalisation)
    augment.py    the crops, hashed on the device
    attacks.py    the attacks an audit can run, by name

It knows nothing of audits or training: `mishield.audit` drives it and judges what it recovers.
"""

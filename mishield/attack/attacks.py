"""The attacks an audit can run, by name (docs/audit.md "Attacks").

All share PPA's engine (initial selection, optimisation, final selection, the selection-only
baseline on the same pool and crops); they differ in what of the audited model the attacker uses:

| attack | optimisation | reads the model's gradients | reads its outputs on generated images |
|---|---|---|---|
| `ppa` | Poincaré loss through the target | yes | yes |
| `lomma` | logit loss through the target and its surrogates | yes | yes |
| `blackbox` | NES on the target's scores | no | yes |
| `blackbox-labels` | NES on the target's top-1 labels | no | yes (labels) |
| `transfer` | through the surrogates alone, selected by them | no | no |

An audit runs every chosen attack on every model and judges each model by its worst case, because
an attacker picks the attack that works best against the model in front of them; the last two
columns say which attacks a model whose gradients look masked, or which treats generated images
differently, can still be judged by (`mishield.audit.masking_checks`). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mishield.errors import UsageError


@dataclass(frozen=True)
class AttackKind:
    name: str
    loss: str  # a name in `mishield.attack.losses.LOSSES` (the gradient and transfer attacks' identity loss)
    surrogates: bool  # whether it needs surrogates distilled from the target
    description: str
    engine: str = "gradient"  # "gradient" (InversionAttack), "blackbox" (BlackBoxAttack) or "transfer" (TransferAttack)
    mode: str | None = None  # the black-box attack's mode ("scores" or "labels")
    target_gradients: bool = True  # the optimisation follows the audited model's input gradients
    target_outputs: bool = True  # selection or optimisation reads the audited model's outputs on generated images

    def to_dict(self) -> dict:
        return {"name": self.name, "engine": self.engine, "mode": self.mode, "loss": self.loss, "surrogates": self.surrogates,
                "target_gradients": self.target_gradients, "target_outputs": self.target_outputs}  # fmt: skip


ATTACKS: dict[str, AttackKind] = {
    # Struppek et al., ICML 2022: the Poincaré loss through the target alone.
    "ppa": AttackKind("ppa", "poincare", False, "PPA: Poincaré loss through the target"),
    # Nguyen et al., CVPR 2023: logit loss with a feature prototype, through the target and surrogates
    # distilled from it ("model augmentation"); surrogates with skip connections give back the gradient
    # paths a RoLSS/SSF defence removed, which is what makes it the adaptive attack against them.
    "lomma": AttackKind("lomma", "logit", True, "LOMMA-style: logit loss + feature prototype through the target and its surrogates"),
    # mishield.attack.blackbox: NES on the latents, reading only the target's outputs; the answer to
    # a defence that only breaks gradients (Athalye et al., ICML 2018).
    "blackbox": AttackKind("blackbox", "poincare", False, "gradient-free: NES on the latents from the target's scores",
                           engine="blackbox", mode="scores", target_gradients=False),
    "blackbox-labels": AttackKind("blackbox-labels", "poincare", False, "gradient-free: NES on the latents from the target's top-1 labels",
                                  engine="blackbox", mode="labels", target_gradients=False),
    # mishield.attack.transfer: the surrogates alone, in every phase; the answer to a model that treats
    # generated images differently from natural ones.
    "transfer": AttackKind("transfer", "poincare", True, "transfer: optimised and selected on the surrogates alone",
                           engine="transfer", target_gradients=False, target_outputs=False),
}
# What an audit runs when no attack is named: the gradient attack and the gradient-free one, plus
# the surrogate attacks wherever every audited model has surrogates (`default_attacks`).
DEFAULT_ATTACKS = ("ppa", "blackbox")
SURROGATE_DEFAULTS = ("lomma", "transfer")


def default_attacks(with_surrogates: bool, prior_kind: str | None) -> list[AttackKind]:
    """The default attack set: ppa and blackbox, with lomma and transfer when every model has surrogates.

    The generator-free prior (`pixels`) leaves the black-box attack out: NES over every pixel of an
    image, at its population of 8, moves too little for the 2000 steps' worth of queries it would cost.
    """
    names = [n for n in DEFAULT_ATTACKS if not (n == "blackbox" and prior_kind == "pixels")]
    if with_surrogates:
        names += SURROGATE_DEFAULTS
    return [ATTACKS[n] for n in names]


def parse_attacks(spec: str | list[str] | tuple[str, ...] | None) -> list[AttackKind]:
    """`"ppa,lomma"` (or a list of names) -> the attack kinds in that order, each once; None: `DEFAULT_ATTACKS`."""
    names = DEFAULT_ATTACKS if spec is None else (spec.split(",") if isinstance(spec, str) else spec)
    chosen: list[AttackKind] = []
    for raw in names:
        name = str(raw).strip().lower()
        if name not in ATTACKS:
            raise UsageError(f"`attacks` takes {', '.join(ATTACKS)} (comma-separated), got {raw!r}.")
        if ATTACKS[name] not in chosen:
            chosen.append(ATTACKS[name])
    if not chosen:
        raise UsageError(f"`attacks` names no attack; choose from {', '.join(ATTACKS)}.")
    return chosen


def make_attack(kind: AttackKind, prior, target, preprocessing, config, runtime, surrogates=(), blackbox=None):
    """The engine object that runs `kind` against `target` (an `InversionAttack` or subclass).

    `surrogates` are (module, Preprocessing) pairs (lomma optimises through them with the target,
    transfer on them alone); `blackbox` is the black-box attack's `BlackBoxConfig` (its mode is the kind's).
    The transfer attack is built without the target.
    """
    import dataclasses

    if kind.engine == "transfer":
        from mishield.attack.transfer import TransferAttack

        return TransferAttack(prior, list(surrogates), config, runtime)
    if kind.engine == "blackbox":
        from mishield.attack.blackbox import BlackBoxAttack
        from mishield.attack.config import BlackBoxConfig

        return BlackBoxAttack(prior, target, preprocessing, config, runtime, dataclasses.replace(blackbox or BlackBoxConfig(), mode=kind.mode))
    from mishield.attack.engine import InversionAttack

    return InversionAttack(prior, target, preprocessing, config, runtime, surrogates=list(surrogates) if kind.surrogates else ())

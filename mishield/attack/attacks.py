"""The attacks an audit can run, by name: `ppa` and the adaptive `lomma` (docs/audit.md "Attacks").

Both share PPA's engine (initial selection, optimisation, final selection on the target); they
differ in the loss the optimiser follows and in the models it follows it through. An audit runs
every chosen attack on every model and judges each model by its worst case, because an attacker
picks the attack that works best against the model in front of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from mishield.errors import UsageError


@dataclass(frozen=True)
class AttackKind:
    name: str
    loss: str  # a name in `mishield.attack.losses.LOSSES`
    surrogates: bool  # whether the optimisation also runs through surrogates distilled from the target
    description: str


ATTACKS: dict[str, AttackKind] = {
    # Struppek et al., ICML 2022: the Poincaré loss through the target alone.
    "ppa": AttackKind("ppa", "poincare", False, "PPA: Poincaré loss through the target"),
    # Nguyen et al., CVPR 2023: logit loss with a feature prototype, through the target and surrogates
    # distilled from it ("model augmentation"); surrogates with skip connections give back the gradient
    # paths a RoLSS/SSF defence removed, which is what makes it the adaptive attack against them.
    "lomma": AttackKind("lomma", "logit", True, "LOMMA-style: logit loss + feature prototype through the target and its surrogates"),
}
DEFAULT_ATTACKS = ("ppa",)


def parse_attacks(spec: str | list[str] | tuple[str, ...] | None) -> list[AttackKind]:
    """`"ppa,lomma"` (or a list of names) -> the attack kinds in that order, each once."""
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

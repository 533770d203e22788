"""Recipe keys that moved, and the message that says how to write them now.

Recipes before the method registry had one flat ``method`` section for every method; now
``method.name`` picks a method and the GAN settings sit under ``method.gan``. A recipe (or
an override) with an old key stops with ``recipe.yaml: method.gan_weight: this key moved:
write method.gan.weight (see README)``, before anything else is checked.
"""

from __future__ import annotations

from distill.errors import ConfigError

# old key -> new key; a section's entry moves every key under it
MOVED = {
    "method.gan_weight": "method.gan.weight",
    "method.critic_gan_weight": "method.gan.critic_weight",
    "method.gan_loss": "method.gan.loss",
    "method.fake_score_updates": "method.critic_updates",
    "method.r1": "method.gan.r1",
    "method.discriminator": "method.gan.discriminator",
}


def new_key(key: str) -> str | None:
    """Where ``key`` (dotted) is written now, or None if it did not move."""
    for old, new in MOVED.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _leaves(tree, prefix: str) -> list[str]:
    if not isinstance(tree, dict) or not tree:
        return [prefix]
    return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{prefix}.{key}")]


def _is_old_ladd(method: dict) -> bool:
    """ADD with the teacher's features and no distillation term: what ``name: ladd`` is now."""
    discriminator = method.get("discriminator")
    return (method.get("name") == "add" and isinstance(discriminator, dict) and discriminator.get("backbone") == "teacher"
            and method.get("distill_weight") == 0)


def check_recipe(data: dict, source: str) -> None:
    """Stop on the first moved key of a recipe mapping, listing the others it has."""
    method = data.get("method")
    if not isinstance(method, dict):
        return
    moved = [(key, new_key(key)) for key in _leaves(method, "method") if new_key(key)]
    if not moved:
        return
    (old, new), others = moved[0], moved[1:]
    message = f"{source}: {old}: this key moved: write {new} (see README)"
    if others:
        message += "; this recipe also has " + ", ".join(f"{o} (now {n})" for o, n in others)
    if _is_old_ladd(method):
        message += ("; method.name: add with method.discriminator.backbone: teacher and method.distill_weight: 0 "
                    "is LADD: write method.name: ladd (those are its defaults)")
    raise ConfigError(message)


def check_override(key: str, source: str) -> None:
    """Stop on a command-line override of a moved key."""
    new = new_key(key)
    if new is not None:
        raise ConfigError(f"{source}: override {key}: this key moved: write {new} (see README)")

"""Distillation methods: how losses compose into a generator phase and a critic phase.

``METHODS`` maps each registered ``method.name`` to its recipe section (``MethodConfig``),
whose ``build`` makes the ``Method`` the trainer runs (see ``distill.methods.base``). A new
method is one module here and one ``register`` line below.
"""

from distill.methods.add import ADD, ADDConfig, LADDConfig
from distill.methods.base import DEFAULT_METHOD, METHODS, Method, MethodConfig, register
from distill.methods.dmd2 import DMD2, Critic, DMD2Config

register("dmd2", DMD2Config)
register("add", ADDConfig)
register("ladd", LADDConfig)

__all__ = ["ADD", "ADDConfig", "Critic", "DEFAULT_METHOD", "DMD2", "DMD2Config", "LADDConfig", "METHODS", "Method",
           "MethodConfig", "register"]

"""Every hook a distillkit plugin can implement.

Each hook receives one argument, ``register``, a callable
``register(name, factory)``. The factory is called with the arguments its
interface names (:mod:`distillkit.interfaces`: e.g. ``spec, seed, device``
for samplers, plus ``data``, a :class:`~distillkit.interfaces.DataContext`,
when the factory declares it) and the user's keyword options (``--set``)
when a run asks for ``name``; protocols are the exception, their options go
through ``EvalProtocol.with_overrides``. What the factory returns depends on
the kind:

=========================  ==================================================
hook                       factory returns
=========================  ==================================================
register_objectives        :class:`~distillkit.interfaces.Objective`
register_parameterizations :class:`~distillkit.interfaces.Parameterization`
register_samplers          :class:`~distillkit.interfaces.Sampler`
register_methods           a :class:`~distillkit.interfaces.Method` (the
                           "factory" may be the Method instance itself)
register_protocols         :class:`~distillkit.interfaces.EvalProtocol` (or
                           the protocol instance itself)
register_models            ``torch.nn.Module``; the name is also registered in
                           timm's registry so ``timm.create_model`` finds it
register_datasets          :class:`~distillkit.interfaces.DatasetSpec`
=========================  ==================================================

Example (the style of simonw/llm and datasette)::

    from distillkit import hookimpl

    @hookimpl
    def register_objectives(register):
        register("cosine", CosineObjective)

Names are unique across all plugins of one kind; a second registration of a
taken name is an error naming both plugins.
"""

import pluggy

hookspec = pluggy.HookspecMarker("distillkit")


@hookspec
def register_objectives(register):
    """Register matching objectives: features of real and synthetic samples -> loss."""


@hookspec
def register_parameterizations(register):
    """Register image parameterizations: learnable tensors that decode to training images."""


@hookspec
def register_samplers(register):
    """Register feature-extractor samplers: which network embeds images at each iteration."""


@hookspec
def register_methods(register):
    """Register methods: named bundles of components and hyperparameters."""


@hookspec
def register_protocols(register):
    """Register evaluation protocols: how evaluator networks are trained and tested."""


@hookspec
def register_models(register):
    """Register model architectures (evaluators and feature extractors)."""


@hookspec
def register_datasets(register):
    """Register real datasets: loading, normalisation and class names."""

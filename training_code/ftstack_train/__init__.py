"""ftstack's training code: what runs inside the SageMaker training container.

Modules are named for what they hold. ``validation``, ``metrics`` and ``contract`` use only
the standard library, so the operator side and the data-staging Lambda import them without torch.
"""

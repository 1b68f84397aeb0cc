"""The training image's build files (Dockerfile, requirements.lock), installed as the data of
``ftstack.training_code`` so that an installed ftstack builds the same image as a clone
(``ftstack.infra.assets``). The training package itself is ``ftstack_train``."""

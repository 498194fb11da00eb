"""The command modules, listed explicitly; importing one registers its commands on the group."""

from autoseg.cli import (  # noqa: F401
    dataset,
    demo,
    evaluate,
    exchange,
    planning,
    predict,
    preprocess,
    schedule,
    sweep,
    train,
)

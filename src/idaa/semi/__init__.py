"""Semi-supervised learning: FixMatch with every adversary on its strong branch, and a supervised baseline."""

from typing import Any

from idaa.semi.cli_args import add_semi_parser, run_semi
from idaa.semi.config import SemiConfig
from idaa.semi.fixmatch import EMA, Classifier, SemiLosses, fixmatch_losses, strong_branch_attack, supervised_losses
from idaa.semi.losses import masked_cross_entropy, pseudo_labels
from idaa.semi.split import class_balanced_split

__all__ = ["EMA", "Classifier", "SemiConfig", "SemiLosses", "add_semi_parser", "class_balanced_split",
           "fixmatch_losses", "masked_cross_entropy", "pseudo_labels", "run_semi", "strong_branch_attack",
           "supervised_losses", "train_semi"]


def __getattr__(name: str) -> Any:  # the loop pulls in the data and view modules: import it only when asked for
    if name == "train_semi":
        from idaa.semi.loop import train_semi

        return train_semi
    raise AttributeError(name)

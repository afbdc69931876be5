"""IDAA inside training code you own: `AdversarialTerm` (plain PyTorch) and, with Lightning installed,
`idaa.integrations.lightning.IDAAMixin`. Nothing here is imported by `import idaa`."""

from idaa.integrations.term import AdversarialTerm, TermLosses, adversarial_mode, convert_to_dual_bn

__all__ = ["AdversarialTerm", "TermLosses", "adversarial_mode", "convert_to_dual_bn"]

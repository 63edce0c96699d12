"""Networks: the 3D (Attention) U-Net (:mod:`.unet`), decoder fusions (:mod:`.fusion`), attention to scale
(:mod:`.multiscale`), reusable attention blocks (:mod:`.blocks`) and the registry that builds every variant
from a config (:mod:`.registry`).

Nothing is imported here, so ``medseg.nets.registry`` (and with it config validation) loads without torch.
"""

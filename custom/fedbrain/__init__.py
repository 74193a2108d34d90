"""fedbrain: federated brain-tumour learning on NVIDIA FLARE with MONAI.

The library runs without FLARE (data, models, training loops) so a centralized
baseline uses the same code as the federated sites.
"""

__version__ = "0.1.0"

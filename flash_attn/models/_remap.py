"""Building blocks of the checkpoint remapping functions of the model files."""

import re
from collections import OrderedDict

import torch.nn.functional as F


def rename_keys(state_dict, *substitutions):
    """An OrderedDict of state_dict's items with each key passed through the (pattern,
    replacement) regex substitutions in turn."""

    def rename(key):
        for pattern, replacement in substitutions:
            key = re.sub(pattern, replacement, key)
        return key

    return OrderedDict((rename(k), v) for k, v in state_dict.items())


def pad_rows(weight, num_rows):
    """weight with zero rows appended up to num_rows rows (an embedding or output matrix padded
    to a padded vocabulary)."""
    return F.pad(weight, (0, 0, 0, num_rows - weight.shape[0]))

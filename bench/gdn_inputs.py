../tests/torch/gdn_inputs.py

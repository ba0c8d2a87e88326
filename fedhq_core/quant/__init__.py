"""Hand-written quantization: fake-quant with STE/LSQ, observers, PTQ, and the upload payload."""
from .fake_quant import (LSQWeight, STEActivation, act_qrange, act_scale_zp, dequantize, mse_weight_scale,
                         quantize, weight_qrange)
from .modules import (QConv2d, QLinear, bias_codes, configure_observers, get_act_ranges, get_weight_steps, set_weight_steps, init_weight_steps, integer_weights,
                      load_model_state, model_state, prepare_deploy, prepare_model, quant_layers, reset_act_ranges,
                      set_act_ranges, set_bits, set_mode)
from .payload import Payload, PackedTensor, pack_update, tensor_bits, unpack_update

__all__ = [n for n in dir() if not n.startswith("_")]

"""deformjax.convert: the mistakes a PyTorch user makes in handing a converter its weights, each answered with the fix;
the module's own argument names beside the source's; what the weights say, read from them.

The parity of each converter with its PyTorch module is in test_dropin.py (torchvision, mmcv DCN),
test_roi_pool.py (mmcv RoI packs), test_family_convert.py (DCNv3, DCNv4, attention) and test_internimage.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from deformjax import convert
from deformjax.models import INTERNIMAGE_PRESETS, InternImage


def mmcv_state(cin=4, cout=6, k=3, offset_channels=27, bias=True, seed=0):
  """A `ModulatedDeformConv2dPack(cin, cout, k)` state dict (`offset_channels = 3*deform_groups*k*k`)."""
  rng = np.random.default_rng(seed)
  state = {'weight': rng.normal(size=(cout, cin, k, k)), 'conv_offset.weight': np.zeros((offset_channels, cin, k, k)),
           'conv_offset.bias': np.zeros(offset_channels)}
  return state | ({'bias': np.zeros(cout)} if bias else {})


def dcnv3_state(c=16, groups=4, taps=9, seed=0):
  """InternImage's `DCNv3(c, group=groups)` state dict (kernel 3)."""
  rng = np.random.default_rng(seed)
  linear = lambda name, out: {f'{name}.weight': rng.normal(size=(out, c)), f'{name}.bias': np.zeros(out)}
  return (linear('input_proj', c) | linear('output_proj', c) | linear('offset', groups * taps * 2)
          | linear('mask', groups * taps) | {'dw_conv.0.weight': rng.normal(size=(c, 1, 3, 3)),
                                             'dw_conv.0.bias': np.zeros(c), 'dw_conv.1.1.weight': np.ones(c),
                                             'dw_conv.1.1.bias': np.zeros(c)})


# --- a state dict where a weight is expected, a weight where a state dict is --------------------------------------

def test_a_whole_state_dict_passed_as_the_weight_names_the_entries_to_pass():
  state = {'weight': np.zeros((6, 4, 3, 3)), 'bias': np.zeros(6)}
  with pytest.raises(TypeError, match=r"from_torchvision: weight must be an OIHW array .*got a state dict with keys "
                                      r"\['bias', 'weight'\]: pass weight=state\['weight'\], bias=state.get\('bias'\)"):
    convert.from_torchvision(state)


def test_a_weight_passed_as_the_state_dict_is_named():
  with pytest.raises(TypeError, match=r'from_mmcv: state must be a state dict \{name: array\}.*got ndarray of shape '
                                      r'\(6, 4, 3, 3\)'):
    convert.from_mmcv(np.zeros((6, 4, 3, 3)))


# --- prefixed and nested state dicts --------------------------------------------------------------------------------

@pytest.mark.parametrize('head', ['module.', 'model.', 'layer4.0.conv2.'])
def test_prefixed_keys_name_the_prefix_to_pass(head):
  state = {head + k: v for k, v in mmcv_state().items()}
  wrapper = r' \(a DataParallel / DistributedDataParallel state dict\)' if head == 'module.' else ''
  with pytest.raises(ValueError, match=rf"from_mmcv: state has no 'weight'.*: keys look prefixed with '{head}'"
                                       rf"{wrapper}: pass prefix='{head}'"):
    convert.from_mmcv(state)
  assert convert.from_mmcv(state, prefix=head).modulated  # the fix works


def test_a_prefix_the_keys_do_not_carry_is_named():
  with pytest.raises(ValueError, match=r"from_dcnv3: state has no 'module.input_proj.weight': keys carry no prefix "
                                       r"'module.': pass prefix=''"):
    convert.from_dcnv3(dcnv3_state(), prefix='module.')


def test_a_key_under_several_prefixes_lists_them():
  state = {f'{head}{k}': v for head in ('a.', 'b.') for k, v in mmcv_state().items()}
  with pytest.raises(ValueError, match=r"under several prefixes: pass prefix= one of \['a.', 'b.'\]"):
    convert.from_mmcv(state)


def test_a_checkpoint_holding_its_state_dict_under_a_key_names_that_key():
  with pytest.raises(ValueError, match=r"from_dcnv4: state\['model'\] is a dict: .*pass state\['model'\]"):
    convert.from_dcnv4({'model': {'offset_mask.weight': np.zeros((56, 32))}, 'epoch': 3})


def test_a_nested_state_dict_names_the_flattening():
  with pytest.raises(ValueError, match=r"from_mmcv: state must be flat .*nested dict under 'conv_offset': flatten it "
                                       r"to '.'-joined keys"):
    convert.from_mmcv({'weight': np.zeros((6, 4, 3, 3)), 'conv_offset': {'weight': np.zeros((27, 4, 3, 3))}})


def test_linen_params_given_a_variables_dict_names_its_params():
  tree = {'Conv_0': {'kernel': np.zeros((3, 3, 1, 2))}}
  with pytest.raises(ValueError, match=r"linen_params: pretrained is a variables dict .*: pass pretrained\['params'\]"):
    convert.linen_params(tree, {'params': tree})


def test_the_model_converters_name_the_checkpoint_key_and_the_prefix():
  one_level = dataclasses.replace(INTERNIMAGE_PRESETS['micro'], depths=(1,), groups=(1,))  # cheap to build
  abstract = nnx.eval_shape(lambda: InternImage(one_level, num_classes=4, rngs=nnx.Rngs(0)))
  state = {key: np.zeros(var.shape[::-1] if layout == 'linear' else (var.shape[3], var.shape[2], *var.shape[:2])
                         if layout == 'conv' else var.shape, np.float32)
           for key, var, layout in convert.state_entries(abstract)}
  with pytest.raises(ValueError, match=r"from_internimage: state\['model'\] is a dict: .*pass state\['model'\]"):
    convert.from_internimage({'model': state}, one_level)
  wrapped = {'module.' + k: v for k, v in state.items()}
  with pytest.raises(ValueError, match=r"does not match InternImage preset .* \(num_classes=0\): keys look prefixed "
                                       r"with 'module.' .*: pass prefix='module.': missing keys"):
    convert.from_internimage(wrapped, one_level)
  assert convert.from_internimage(wrapped, one_level, prefix='module.').num_classes == 4


# --- layouts --------------------------------------------------------------------------------------------------------

def test_an_hwio_weight_is_named_with_the_transpose_by_its_bias():
  weight = np.random.default_rng(0).normal(size=(6, 4, 3, 3))
  hwio = weight.transpose(2, 3, 1, 0)
  with pytest.raises(ValueError, match=r"from_torchvision: weight must be OIHW .*got shape \(3, 3, 4, 6\), which "
                                       r"looks HWIO .*: pass weight.transpose\(3, 2, 0, 1\)"):
    convert.from_torchvision(hwio, np.zeros(6))
  assert convert.from_torchvision(hwio.transpose(3, 2, 0, 1), np.zeros(6)).kernel.shape == (3, 3, 4, 6)


def test_an_hwio_weight_is_named_by_its_shape_alone_when_unambiguous():
  with pytest.raises(ValueError, match=r'looks HWIO \[kh, kw, C_in, C_out\]'):
    convert.from_torchvision(np.zeros((3, 3, 16, 32)))
  with pytest.raises(ValueError, match=r"from_mmcv: layer.weight must be OIHW .*looks HWIO"):
    convert.from_mmcv({'layer.' + k: v for k, v in mmcv_state(cin=16, cout=32).items()} |
                      {'layer.weight': np.zeros((3, 3, 16, 32))}, prefix='layer.')
  assert convert.from_torchvision(np.zeros((8, 8, 3, 3))).kernel.shape == (3, 3, 8, 8)  # ambiguous: OIHW, as asked


# --- argument names -------------------------------------------------------------------------------------------------

def test_from_torchvision_takes_the_module_s_names_and_torchvision_s():
  weight = np.zeros((6, 2, 3, 3))
  layer = convert.from_torchvision(weight, strides=2, kernel_dilation=2, feature_group_count=2, padding=1)
  assert (layer.strides, layer.kernel_dilation, layer.feature_group_count, layer.in_features) == ((2, 2), (2, 2), 2, 4)
  same = convert.from_torchvision(weight, stride=2, dilation=2, groups=2, padding=1)
  assert (same.strides, same.kernel_dilation, same.feature_group_count) == ((2, 2), (2, 2), 2)
  for ours, theirs in (('strides', 'stride'), ('kernel_dilation', 'dilation'), ('feature_group_count', 'groups')):
    with pytest.raises(TypeError, match=rf"from_torchvision: pass {ours} \(the module's name\) or {theirs} "
                                        r"\(the source's\), not both"):
      convert.from_torchvision(weight, **{ours: 2, theirs: 2})


def test_the_family_converters_take_the_reference_s_names():
  layer = convert.from_dcnv3(dcnv3_state(), group=4, pad=1, dilation=1)
  assert (layer.groups, layer.padding) == (4, 1)
  with pytest.raises(TypeError, match=r'from_dcnv3: pass groups .* or group .*, not both'):
    convert.from_dcnv3(dcnv3_state(), groups=4, group=4)


# --- read from the weights ------------------------------------------------------------------------------------------

def test_from_mmcv_reads_the_groups_and_the_offset_groups_from_the_weights():
  state = mmcv_state(cin=4, offset_channels=54) | {'weight': np.zeros((6, 2, 3, 3))}  # groups=2, deform_groups=2
  layer = convert.from_mmcv(state)  # 54 = 3*2*9 (DCNv2), or 2*3*9 (DCNv1) but 3 groups cannot split 4 channels
  assert (layer.feature_group_count, layer.offset_groups, layer.modulated) == (2, 2, True)
  state = mmcv_state(cin=6, offset_channels=54) | {'weight': np.zeros((6, 3, 3, 3))}
  assert convert.from_mmcv(state).modulated  # a bias: DCNv2 (mmcv's DCNv1 layer has none)
  no_bias = {k: v for k, v in state.items() if k != 'bias'}
  with pytest.raises(ValueError, match=r'offset_groups=2 for DCNv2 or offset_groups=3 for DCNv1: pass offset_groups='):
    convert.from_mmcv(no_bias)
  assert not convert.from_mmcv(no_bias, deform_groups=3).modulated
  with pytest.raises(ValueError, match=r'feature_group_count=3 does not fit \(it must be 6 // 3\)'):
    convert.from_mmcv(state, groups=3)


def test_the_family_converters_read_groups_from_the_weights():
  assert convert.from_dcnv3(dcnv3_state(groups=2)).groups == 2
  with pytest.raises(ValueError, match=r'mask.weight predicts 18 mask values, not a multiple of 8 taps'):
    convert.from_dcnv3(dcnv3_state(groups=2), remove_center=True)
  state = {'offset_mask.weight': np.zeros((112, 32)), 'offset_mask.bias': np.zeros(112)}  # ceil8(4*9*3)
  assert convert.from_dcnv4(state).groups == 4
  with pytest.raises(ValueError, match=r'offset_mask.weight has 112 rows, which groups=none packs with 25 taps: pass '
                                       r'groups='):
    convert.from_dcnv4(state, kernel_size=5)


def test_from_mmcv_deform_roi_pool_reads_a_square_output_size():
  c, f, rng = 4, 8, np.random.default_rng(0)
  state = {'offset_fc.0.weight': rng.normal(size=(f, c * 4)), 'offset_fc.0.bias': np.zeros(f),
           'offset_fc.2.weight': rng.normal(size=(f, f)), 'offset_fc.2.bias': np.zeros(f),
           'offset_fc.4.weight': np.zeros((8, f)), 'offset_fc.4.bias': np.zeros(8)}
  pool = convert.from_mmcv_deform_roi_pool(state)
  assert (pool.output_size, pool.in_features) == ((2, 2), 4)
  with pytest.raises(ValueError, match=r'predicts offsets for 3 bins, not a square: pass output_size='):
    convert.from_mmcv_deform_roi_pool(state | {'offset_fc.4.weight': np.zeros((6, f)), 'offset_fc.4.bias': np.zeros(6)})


def test_from_torchvision_reads_the_offset_groups_off_the_offsets_as_torchvision_does():
  layer = convert.from_torchvision(np.ones((6, 4, 3, 3), np.float32))
  x = np.ones((1, 5, 5, 4), np.float32)
  for groups in (1, 2):
    assert layer(x, np.zeros((1, 3, 3, groups * 18), np.float32)).shape == (1, 3, 3, 6)


def test_an_entry_in_flax_s_layout_is_named_with_the_transpose():
  state = dcnv3_state()
  with pytest.raises(ValueError, match=r"'dw_conv.0.weight' must have shape \(16, 1, 3, 3\), got \(3, 3, 1, 16\) "
                                       r"\(Flax's layout: pass dw_conv.0.weight.transpose\(3, 2, 0, 1\)\)"):
    convert.from_dcnv3(state | {'dw_conv.0.weight': state['dw_conv.0.weight'].transpose(2, 3, 1, 0)})
  with pytest.raises(ValueError, match=r"'mask.weight' must have shape \(36, 16\), got \(16, 36\) \(Flax's layout: "
                                       r"pass mask.weight.T\)"):
    convert.from_dcnv3(state | {'mask.weight': state['mask.weight'].T}, groups=4)

"""Model zoo: classifiers, face backbones, margin heads and checkpoint loaders."""

from .adaface import ADAFACE_LAYERS, AdaFaceIR, BasicBlockIR, adaface_ir
from .checkpoints import (
    UntrustedCheckpointError,
    load_checkpoint,
    load_state_dict_strictly,
    state_dict_in,
    strip_prefix,
)
from .classifiers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    Preprocessing,
    build_classifier,
    classifier_names,
    finetune_classifier,
    replace_head,
)
from .cnn import SmallCNN
from .face import FaceEmbedder, build_face_model, face_arch_names, guess_face_arch
from .heads import AdaFaceHead, ArcFaceHead, CombinedMarginHead, CosFaceHead
from .iresnet import IRESNET_LAYERS, IBasicBlock, IResNet, iresnet
from .onnx import OnnxBackbone, has_baked_normalization, load_onnx_backbone
from .submodules import find_submodule, module_name
from .target_layers import name_target_layer, target_layer

"""Datasets and LightningDataModules for every supported format, plus synthetic ground truth."""

from fame.data.align import align_face, align_faces
from fame.data.face_modules import FaceRecognitionDataModule, FaceTrainingDataModule, VerificationDataModule
from fame.data.folder import ImageFolderDataset
from fame.data.identity import IdentityFolderDataset
from fame.data.imagenet import ImageNetValidation, build_imagenet_subset
from fame.data.modules import ClassificationDataModule
from fame.data.photos import PhotoDataset
from fame.data.recordio import RecordIODataset
from fame.data.shapes import SHAPE_CLASSES, ShapesDataset
from fame.data.shortcut import ShortcutShapesDataset
from fame.data.synthetic_faces import SyntheticFacePairs, SyntheticFaces
from fame.data.verification import PairsDataset, load_verification_bin

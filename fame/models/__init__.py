"""Model zoo: classifiers, face backbones, margin heads and checkpoint loaders."""

"""EfficientAD (Batzner et al., WACV 2024): PDN teacher/student, autoencoder, training, export, serving."""

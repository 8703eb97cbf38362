# Many identities on a GPU: the CPU recipe (configs/lfw_cpu.py: aligned LFW DevTrain people, people held out whole,
# ArcFace over every training identity, grayscale augmentation, the checkpoint chosen on held-out people's pairs)
# at the aligned crops' full 112x112 with a ResNet50, batches of 128 people x 2 images, 40 epochs; mixed precision
# and channels_last are train.py's CUDA defaults. Measured on one NVIDIA H200 (docs/results.md): 48 s of training,
# and weaker on people never trained on than configs/lfw_cpu.py, which remains the recipe for these photos.
#   python train.py configs/lfw_gpu.py
#   python test.py --data_dir=data/lfw/unseen             # people never trained on
data_dir = "data/lfw"
backbone = "resnet50"
zero_init_residual = True
image_size = 112
grayscale = 0.5
embedding_dim = 128
loss = "arcface"
arcface_margin = 0.3
batch_size = 256
images_per_identity = 2
optimizer = "adam"
lr = 2e-3
lr_schedule = "onecycle"
epochs = 40
select_on = "pairs"

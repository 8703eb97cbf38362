# Fast CPU recipe for AT&T-sized data: ResNet18 at 64x56 from random initialisation, ArcFace over P x K batches
# of 16 people x 2 images (8 x 4 people x images did worse), Adam at 4e-3 with a one-cycle schedule (2e-3 and 14
# epochs: 97.92 % mean best top-1 within 60 s over 3 seeds; 4e-3 and 13 epochs: 98.33 %), 13 epochs. About a minute
# of training on 2 CPU cores.
#   python train.py configs/att_fast_cpu.py
backbone = "resnet18"
zero_init_residual = True
image_size = (64, 56)
loss = "arcface"
batch_size = 32
images_per_identity = 2
optimizer = "adam"
lr = 4e-3
lr_schedule = "onecycle"
epochs = 13

# Fast CPU recipe for AT&T-sized data: ResNet18 at 64x56 from random initialisation, ArcFace over P x K batches
# of 16 people x 2 images (on AT&T, 98.33 % mean top-1 over 3 seeds; 8 x 4 people x images reached 96.67 %), Adam with
# a one-cycle schedule, 14 epochs. About a minute of training on 2 CPU cores.
#   python train.py configs/att_fast_cpu.py
backbone = "resnet18"
zero_init_residual = True
image_size = (64, 56)
loss = "arcface"
batch_size = 32
images_per_identity = 2
optimizer = "adam"
lr = 2e-3
lr_schedule = "onecycle"
epochs = 14

# ResNet50 with a single Linear 2048 -> 512 head and the margin triplet loss on plain Euclidean distances
# (nn.TripletMarginLoss), AdamW, 20 epochs. Images in each identity's distortion/ sub-folder train too.
#   python train.py configs/resnet50_distortion.py     # best checkpoint: out/tb_model.pth
# A face-trained start (where ImageNet weights, --pretrained=True, cannot be downloaded): a student of dlib on LFW
# (configs/distill_lfw_cpu.py --backbone=resnet50, docs/results.md "A ResNet50 student"), then
#   python train.py configs/resnet50_distortion.py --init_from=out/distill_r50/tb_model.pth --image_size=64
# AT&T 7/1/2 test top-1 98.75 % (90.00 % at 112x96); from random weights 87.50 %.
image_size = (112, 96)
zero_init_residual = False
backbone = "resnet50"
head = "linear"
embedding_dim = 512
loss = "triplet"
mining = "none"
squared = False
margin = 1.0
batch_size = 32
optimizer = "adamw"
lr = 2e-4
weight_decay = 1e-2
lr_schedule = "step"
step_size = 10
epochs = 20

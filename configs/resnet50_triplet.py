# ResNet50 triplet network: random (anchor, positive, negative) triplets, squared-L2 triplet loss,
# 512-BN-ReLU-128 head, Adam 2e-4 with StepLR every 5 epochs, 10 epochs, flip/crop/rotation augmentation.
#   python train.py configs/resnet50_triplet.py
# A face-trained start (where ImageNet weights, --pretrained=True, cannot be downloaded): a student of dlib on LFW
# (configs/distill_lfw_cpu.py --backbone=resnet50, docs/results.md "A ResNet50 student"), then
#   python train.py configs/resnet50_triplet.py --init_from=out/distill_r50/tb_model.pth --image_size=64
# AT&T 7/1/2 test top-1 98.75 % (91.25 % at 112x96); from random weights 66.25 %.
image_size = (112, 96)
zero_init_residual = False
backbone = "resnet50"
head = "mlp"
hidden_dim = 512
embedding_dim = 128
loss = "triplet"
mining = "none"
margin = 0.2
squared = True
batch_size = 32
optimizer = "adam"
lr = 2e-4
lr_schedule = "step"
step_size = 5
gamma = 0.1
epochs = 10

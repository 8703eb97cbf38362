# ResNet50 with a single Linear 2048 -> 512 head and the margin triplet loss on plain Euclidean distances
# (nn.TripletMarginLoss), AdamW, 20 epochs. Images in each identity's distortion/ sub-folder train too.
#   python train.py configs/resnet50_distortion.py     # best checkpoint: out/tb_model.pth
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

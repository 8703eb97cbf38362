# ResNet50 triplet network: random (anchor, positive, negative) triplets, squared-L2 triplet loss,
# 512-BN-ReLU-128 head, Adam 2e-4 with StepLR every 5 epochs, 10 epochs, flip/crop/rotation augmentation.
#   python train.py configs/resnet50_triplet.py
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

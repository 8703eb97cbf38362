# Passport-photo matching: frozen ImageNet VGG16 convolutional features, its fully connected classifier and two
# Linear layers trained to a 108-d embedding with the triplet loss, anchors drawn only from the ID photos
# (file names containing "script"), SGD. Evaluate against the ID photos alone:
#   python train.py configs/passport_vgg16.py --data_dir=data/passports
#   python test.py --gallery_pattern=script
# Offline, --pretrained=False trains from random features (much weaker).
image_size = 112
backbone = "vgg16"
pretrained = True
freeze_backbone = True
head = "mlp"
hidden_dim = 512
embedding_dim = 108
anchor_pattern = "script"
loss = "triplet"
mining = "none"
margin = 0.2
batch_size = 16
optimizer = "sgd"
lr = 1e-2
lr_schedule = "step"
step_size = 5
epochs = 10

# Siamese network: the small CNN, contrastive loss on balanced same/different pairs drawn afresh each epoch,
# Adam 1e-3, a checkpoint every 5 epochs, architecture / optimiser / parameter counts printed (verbosity 3).
#   python train.py configs/siamese_contrastive.py
image_size = (112, 96)
backbone = "smallcnn"
head = "mlp"
hidden_dim = 256
embedding_dim = 128
loss = "contrastive"
mining = "none"
margin = 1.0
batch_size = 32
optimizer = "adam"
lr = 1e-3
lr_schedule = "cosine"
epochs = 20
save_every = 5
verbosity = 3

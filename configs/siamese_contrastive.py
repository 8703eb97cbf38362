# Siamese network: the small CNN, contrastive loss on the pairs of P x K batches (16 people x 4 images: every one of
# the 96 same-person and 1,920 different-people pairs of a batch), Adam 1e-3, a checkpoint every 10 epochs,
# architecture / optimiser / parameter counts printed (verbosity 3).
#   python train.py configs/siamese_contrastive.py
# The embeddings are L2-normalised, so pair distances lie in [0, 2]: margin 2.0 keeps every pair of two people
# active (margin 1.0 let the positive term shrink all embeddings into one cap, 80-90 % of negatives inside it).
# Every pair of a batch, not one same and one different pair per image: one random pair of two people per image
# is too weak a push (the network learned slowly, to 72.5 % at best), and weighing the pairs of one person as much
# as the far more numerous pairs of two (balanced pairs) held it at 72.5 % too: docs/results.md.
# 64x56 input: the small CNN's receptive field covers more of the face before its global average pooling, and an
# epoch costs a third of 112x96's.
image_size = (64, 56)
backbone = "smallcnn"
head = "mlp"
hidden_dim = 256
embedding_dim = 128
loss = "contrastive"
mining = "batch_all"
margin = 2.0
batch_size = 64
images_per_identity = 4
optimizer = "adam"
lr = 1e-3
lr_schedule = "cosine"
epochs = 100
save_every = 10
verbosity = 3

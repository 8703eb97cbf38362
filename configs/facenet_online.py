# FaceNet-style online triplet mining: semi-hard negatives inside P x K batches, ResNet18, 128-d embeddings,
# curves against iterations. For LFW-style data, keep people with 20-30 images and split 0.8/0.1/0.1:
#   python prepare.py split lfw data/lfw_20_30 --min_images=20 --max_images=30 --valid=0.1 --test=0.1
#   python train.py configs/facenet_online.py --data_dir=data/lfw_20_30
# From random weights there: test top-1 49.06 %; from a dlib student that never saw those people
# (--init_from=out/distill_no23/tb_model.pth, docs/results.md "Learning from dlib"): 90.57 %.
# Variants: --backbone=alexnet or --backbone=resnet152, --embedding_dim=64, --batch_size=32.
image_size = 112
backbone = "resnet18"
zero_init_residual = True
embedding_dim = 128
loss = "triplet"
mining = "semihard"
margin = 0.2
batch_size = 64
images_per_identity = 4
optimizer = "adam"
lr = 1e-3
lr_schedule = "onecycle"
epochs = 30
plot_x = "step"

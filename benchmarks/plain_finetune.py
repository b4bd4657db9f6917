"""The baseline of benchmarks/fixed_costs.py: fine-tuning as a plain 35-line script would do it.

timm's BiT ResNet-v2 (random init, no download) + torchvision ImageFolder, the same job as
`bigtransfer finetune`: resize/random-crop/flip at RESIZE/CROP, SGD with momentum, then top-1 on
the test folder. Usage: python benchmarks/plain_finetune.py DATA STEPS BATCH RESIZE CROP
"""

import sys

import timm
import torch
from torchvision import datasets, transforms

data, steps, batch, resize, crop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
normalize = transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
train_tf = transforms.Compose([transforms.Resize((resize, resize)), transforms.RandomCrop(crop),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
test_tf = transforms.Compose([transforms.Resize((crop, crop)), transforms.ToTensor(), normalize])
train = datasets.ImageFolder(f"{data}/train", train_tf, loader=lambda p: datasets.folder.pil_loader(p))
test = datasets.ImageFolder(f"{data}/test", test_tf)
model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=len(train.classes))
loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)
optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
model.train()
step = 0
while step < steps:
    for images, labels in loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == steps:
            break
model.eval()
correct = 0
with torch.no_grad():
    for images, labels in torch.utils.data.DataLoader(test, batch_size=64, num_workers=1):
        correct += int((model(images).argmax(1) == labels).sum())
print(f"top-1 {correct / len(test):.2%}")

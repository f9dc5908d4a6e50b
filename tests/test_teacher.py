"""Semantic teacher specs resolve to frozen modules kept out of the student's state_dict."""
import pytest
import torch
import torch.nn as nn

from tokenizers_vis.teacher import TeacherError, TeacherSlot, build_teacher


class Student(nn.Module):
    def __init__(self, teacher):
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.teacher = TeacherSlot(teacher)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 8, stride=8)

    def patch_features(self, x):
        return self.conv(x)


def test_teacher_stays_out_of_state_dict_and_is_frozen():
    s = Student("eval/shapes-net:shapes")
    assert set(s.state_dict()) == {"proj.weight", "proj.bias"}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f = s.teacher(x)
    assert f.shape == (2, 128, 8, 8) and not f.requires_grad
    assert all(not p.requires_grad for p in s.teacher.model.parameters())
    assert set(s.state_dict()) == {"proj.weight", "proj.bias"}  # still out after building it


def test_set_and_none_and_bad_specs():
    s = Student("none")
    assert not s.teacher.enabled
    with pytest.raises(TeacherError, match="none"):
        s.teacher(torch.zeros(1, 3, 8, 8))
    s.teacher.set(Tiny())
    assert s.teacher(torch.zeros(1, 3, 16, 16)).shape == (1, 5, 2, 2)
    with pytest.raises(TeacherError, match="patch_features"):
        s.teacher.set(nn.Linear(1, 1))
    with pytest.raises(TeacherError, match="unknown model"):
        build_teacher("eval/no-such-net")
    with pytest.raises(TeacherError, match="not found"):
        build_teacher("timm:vit_tiny_patch16_224@/nonexistent/weights.safetensors")


def test_timm_vit_tokens_become_a_map():
    t = build_teacher("timm:vit_tiny_patch16_224")
    f = t.patch_features(torch.zeros(1, 3, 64, 64))
    assert f.shape == (1, 192, 14, 14)

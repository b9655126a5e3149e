"""Lets Triton's CPU interpreter (TRITON_INTERPRET=1) run loops with run-time trip counts.

The interpreter stores every scalar as a one-element array and converts it with
int(array), which NumPy >= 2.4 refuses for arrays of one dimension; `range(n)` over a
loaded length then fails. This re-registers the conversion through reshape(()).
Compiled (GPU) kernels are untouched.
"""
import os


def patch_interpreter_scalar_index():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_oryx_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patch_lang_tensor._oryx_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor

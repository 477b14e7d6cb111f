// Autograd of the fused loss ops, in C++ (one boxed kernel for all of them, in the `npid`
// library and in the emulated-CUDA `npid_emu`).
//
// Every fused loss returns (per-sample loss, grad_x, ...) from one pass, so its backward is
// grad_x scaled by the incoming gradient of the loss: x is the only differentiable input, the
// outputs after the first are not differentiable. torch.library.register_autograd expressed
// this in Python, but its wrapper costs ~0.2 ms per training step (forward and backward
// through a Python autograd.Function): 3-4% of the CPU step of issue 17. Here the same formula
// runs in torch::autograd::Function, whose bookkeeping is a few microseconds.
//
// The kernel is boxed, so one function serves ops with different argument lists: x is the
// first argument, loss and grad_x the first two returns (schemas.h).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace npid {

namespace detail {

struct FusedLossFunction : torch::autograd::Function<FusedLossFunction> {
  // The op's arguments stay on `stack` (x among them); x is passed separately only so that
  // autograd records it as the input. Returns all of the op's outputs.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& /* x */,
                                                const c10::OperatorHandle* op,
                                                c10::DispatchKeySet keys, torch::jit::Stack* stack) {
    const size_t num_returns = op->schema().returns().size();
    op->redispatchBoxed(keys & c10::after_autograd_keyset, stack);
    torch::autograd::variable_list outputs;
    outputs.reserve(num_returns);
    for (size_t i = stack->size() - num_returns; i < stack->size(); ++i)
      outputs.push_back((*stack)[i].toTensor());
    torch::jit::drop(*stack, num_returns);
    ctx->mark_non_differentiable(
        torch::autograd::variable_list(outputs.begin() + 1, outputs.end()));
    ctx->save_for_backward({outputs[1]});
    return outputs;
  }

  // d loss / d x[b] = grad_loss[b] * grad_x[b]; nothing for the non-tensor "inputs".
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor grad_x = ctx->get_saved_variables()[0];
    at::Tensor grad_input;
    if (grads[0].defined()) grad_input = at::mul(grads[0].unsqueeze(1), grad_x);
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

inline void fused_loss_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                torch::jit::Stack* stack) {
  const size_t num_arguments = op.schema().arguments().size();
  const at::Tensor x = (*stack)[stack->size() - num_arguments].toTensor();
  const auto outputs = FusedLossFunction::apply(x, &op, keys, stack);
  for (const at::Tensor& output : outputs) stack->emplace_back(output);
}

}  // namespace detail

// Registers the fused losses' autograd kernel in `m` (a TORCH_LIBRARY_IMPL(ns, Autograd, m)).
inline void register_fused_loss_autograd(torch::Library& m) {
  for (const char* name : {"nce_loss", "softmax_ce_loss", "full_softmax_loss", "shared_nce_loss",
                           "shared_softmax_ce_loss"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&detail::fused_loss_autograd>());
}

}  // namespace npid

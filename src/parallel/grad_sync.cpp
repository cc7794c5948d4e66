#include "parallel/grad_sync.h"

namespace nextron {

TpGradSync::TpGradSync(const TpShardMap& map, const TensorParallel& tp, Ops& ops) : tp_(tp), ops_(&ops) {
  if (!tp.active()) return;
  const int P = tp.size();
  for (const ParamSpec& l : map.local_table().specs()) {
    const ParamSpec& f = map.full_table().get(l.name);  // the stage's parameters keep their global names
    // Replication and its gradient rule are the local table's (folded experts are whole on every rank and their
    // router's gradient a partial sum, unlike the single-device table says).
    if (l.tp_dim < 0) {
      if (l.tp_grad == TpGradSum::always || (l.tp_grad == TpGradSum::with_sp && tp.sequence_parallel())) {
        items_.push_back({l.offset, l.numel(), total_});
        total_ += l.numel();
      }
      continue;
    }
    bool replicated_units = false;
    const std::vector<int64_t> parts = f.tp_parts.empty() ? std::vector<int64_t>{f.shape[f.tp_dim]} : f.tp_parts;
    for (int64_t part : parts) replicated_units |= part / f.tp_unit < P;
    if (!replicated_units) continue;
    // Each rank writes its copy at the head's place in a full-size slot (zeros elsewhere): after the sum, a head's
    // place holds the sum over the ranks that hold it.
    for (const TpRun& r : map.runs())
      if (r.local_offset >= l.offset && r.local_offset < l.offset + l.numel())
        items_.push_back({r.local_offset, r.count, total_ + (r.full_offset - f.offset)});
    total_ += f.numel();
  }
}

void TpGradSync::run(Tensor& grads) {
  if (total_ == 0) return;
  Tensor& packed = ops_->f32_zeroed(packed_, {total_});
  auto grad = [&grads](const Item& it) { return Tensor::view_of(grads, it.local_offset, {it.count}); };
  auto slot = [&packed](const Item& it) { return Tensor::view_of(packed, it.packed_offset, {it.count}); };
  for (const Item& it : items_) {
    Tensor dst = slot(it);
    ops_->cast(dst, grad(it));  // same dtype: a device-side copy on the backend's stream
  }
  tp_.sum(packed);
  for (const Item& it : items_) {
    Tensor dst = grad(it);
    ops_->cast(dst, slot(it));
  }
}

}  // namespace nextron

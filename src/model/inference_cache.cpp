#include "model/inference_cache.h"

#include "core/error.h"

namespace nextron {

void InferenceCache::reset_slot(int64_t b) {
  NEXTRON_CHECK(b >= 0 && b < batch, "generation: slot ", b, " is outside the cache's ", batch);
  length[static_cast<size_t>(b)] = 0;
  // The keys and values past a slot's length are never read; the window and the state start from zero.
  for (LayerCache& l : layers)
    for (Tensor* t : {&l.conv, &l.state})
      if (t->defined()) t->slice0(b, b + 1).zero_();
}

}  // namespace nextron

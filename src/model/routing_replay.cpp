#include "model/routing_replay.h"

#include <utility>

#include "core/error.h"

namespace nextron {

void RoutingReplay::record(int64_t layer, std::vector<int32_t> indices, int64_t N, int64_t K) {
  NEXTRON_CHECK(int64_t(indices.size()) == N * K, "routing replay: layer ", layer, " recorded ", indices.size(),
                " indices for ", N, " rows of top-", K);
  choices_[layer] = Choice{N, K, std::move(indices)};
}

const std::vector<int32_t>& RoutingReplay::choice(int64_t layer, int64_t N, int64_t K, int64_t E) const {
  const auto it = choices_.find(layer);
  NEXTRON_CHECK(it != choices_.end(), "routing replay: nothing was recorded for MoE layer ", layer,
                " (run the reference forward in record mode first, on a model of the same config)");
  const Choice& c = it->second;
  NEXTRON_CHECK(c.N == N && c.K == K, "routing replay: layer ", layer, " was recorded for ", c.N, " rows of top-", c.K,
                ", this forward has ", N, " rows of top-", K, " (replay needs the same batch and config)");
  for (size_t i = 0; i < c.indices.size(); ++i)
    NEXTRON_CHECK(c.indices[i] >= 0 && c.indices[i] < E, "routing replay: layer ", layer, " recorded expert ",
                  c.indices[i], " for row ", int64_t(i) / K, ", outside [0, ", E, ")");
  return c.indices;
}

}  // namespace nextron

// Errors: every user-facing failure is a nextron::Error whose message names the problem and the fix.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace nextron {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace nextron

// NEXTRON_CHECK(cond, parts...): throw nextron::Error with the concatenated message when cond is false.
#define NEXTRON_CHECK(cond, ...)                                                 \
  do {                                                                           \
    if (!(cond)) throw ::nextron::Error(::nextron::detail::concat(__VA_ARGS__)); \
  } while (0)

// NEXTRON_ASSERT: internal invariant (a bug in nextron, not in the user's input).
#define NEXTRON_ASSERT(cond)                                                                                         \
  do {                                                                                                               \
    if (!(cond))                                                                                                     \
      throw ::nextron::Error(::nextron::detail::concat("internal error: ", #cond, " at ", __FILE__, ":", __LINE__)); \
  } while (0)

# Ruby's Net::HTTP, unchanged: GET of one Publer URL (ARGV[0]) with the key from
# PUBLER_API_KEY. Its proxy comes from the environment (http_proxy: see
# docs/clients-you-cannot-change.md).
require "net/http"
require "json"

uri = URI(ARGV[0])
response = Net::HTTP.get_response(uri, { "Authorization" => "Bearer-API #{ENV.fetch('PUBLER_API_KEY')}" })
puts JSON.generate({ status: response.code.to_i, body: response.body })

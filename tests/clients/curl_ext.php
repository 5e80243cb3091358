<?php
// PHP's curl extension, unchanged: GET of one Publer URL ($argv[1]) with the key from
// PUBLER_API_KEY. libcurl takes its proxy from HTTPS_PROXY (or https_proxy).
$handle = curl_init($argv[1]);
curl_setopt($handle, CURLOPT_RETURNTRANSFER, true);
curl_setopt($handle, CURLOPT_HTTPHEADER, ["Authorization: Bearer-API " . getenv("PUBLER_API_KEY")]);
$body = curl_exec($handle);
if ($body === false) {
    fwrite(STDERR, curl_error($handle) . "\n");
    exit(1);
}
echo json_encode(["status" => curl_getinfo($handle, CURLINFO_RESPONSE_CODE), "body" => $body]), "\n";

// Java's HttpClient, unchanged: GET of one Publer URL (args[0]) with the key from
// PUBLER_API_KEY. It ignores proxy variables: -Dhttps.proxyHost/-Dhttps.proxyPort and a
// trust store (-Djavax.net.ssl.trustStore) are given on the java command line instead.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class HttpClientGet {
    public static void main(String[] args) throws Exception {
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
            .header("Authorization", "Bearer-API " + System.getenv("PUBLER_API_KEY"))
            .build();
        HttpResponse<String> response =
            HttpClient.newHttpClient().send(request, HttpResponse.BodyHandlers.ofString());
        System.out.println("{\"status\": " + response.statusCode() + ", \"body\": "
            + "\"" + response.body().replace("\\", "\\\\").replace("\"", "\\\"") + "\"}");
    }
}
